"""What a person looks at: figures, the HTML report and run comparison."""
